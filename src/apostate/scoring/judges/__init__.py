"""Judges: what decides whether a response is a refusal, a real answer, or broken.

One interface (`Judge`, refined.py): `name` (it keys cached verdicts), `check()` (once, at start-up: one
clear error line if the judge cannot work), and `verdicts(prompts, responses)`. Three kinds:
- `markers` (markers.py): refusal marker strings, then the cheap broken checks; the search's;
- `model` (model.py): a local judge model, decided from one forward pass per batch;
- `endpoint` (endpoint.py): an OpenAI-compatible server.
A model or endpoint judge runs as a `RefinedJudge` (refined.py): the cheap broken checks (degeneration.py)
first, then the markers, then the judge on the responses its scope names (by default only the
marker refusals, which it confirms or overturns), its verdicts cached per run (cache.py).
"""
