"""One module per benchmark; each `run(EvalRun) -> {"summary": {...}, ...}`."""
