"""``xmr compare``: methods, baselines and ablations trained across seeds, summarised with
confidence intervals, and the seeds' claims checked against the results."""
