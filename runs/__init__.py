"""Running a job, apart from the method: errors and the command line, files written atomically,
caches and their manifests, resume, signals, devices and processes, the optimiser's schedule,
progress and throughput, loss curves. Imports nothing from the top level."""
