"""Refusal directions: mean residuals at the last prompt token for harmless and harmful
prompts (residuals), and per layer their normalized difference (refusal). `apostate inspect`
(inspect) shows the residual geometry behind them, layer by layer (geometry, plots)."""
