"""Entry points: one module per console script (`vtbench` is `main`); no engine code."""
