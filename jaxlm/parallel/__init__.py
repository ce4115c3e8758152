"""The device mesh, logical sharding, multi-process start-up, the watchdog and the supervisor."""
