"""The train step, the loop around it, optimizers, FLOPs and memory accounting, reports and AOT compilation."""
