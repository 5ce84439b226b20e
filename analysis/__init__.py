"""Outlier analysis: the definitions (what counts as a massive activation, a weight outlier, an attention
sink), the capture sites of a forward, the statistics over what was captured, the interventions, and the
telemetry a training run records."""
