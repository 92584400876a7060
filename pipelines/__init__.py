"""Ray Data pipelines: wiring only; the stage logic lives in ``echopulse``."""
