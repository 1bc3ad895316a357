"""How far a trial moved the model: KL divergence from the base on harmless prompts, and refusals
on harmful ones (scorer, verdicts); what is measured once to score well (calibration); and the
judges that label responses (judges/)."""
