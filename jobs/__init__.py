"""Ray Train / Ray Tune entry points and named run recipes."""
