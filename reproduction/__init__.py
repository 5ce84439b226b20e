"""reproduce.py's library, one module per job: `plan` (the scales and everything a run will do), `gpu_time`
(the gpu scale's time model and budget, from measured throughputs), `state` (what earlier runs left done),
`runner` (the stages as subprocesses, with deadlines), `collect` (each run's numbers from its own files),
`findings` (what they show, in sentences), `figures` and `report` (REPORT.md, reproduce.json, the figures);
`paths` holds the repo-relative path helpers they share."""
