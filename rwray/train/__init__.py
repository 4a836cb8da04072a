"""Training one job on Ray Train: the driver (`launch.run`) checks its input (`preflight`), finds or creates its run
(`identity`) and starts the workers, which each run `loop.train_loop_per_worker` over `batches` with the plain-torch
`epoch` bodies and write `checkpoint` folders. `rayenv` is the driver's side of Ray."""
