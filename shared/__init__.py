"""orderflow's common package: the contract, settings, broker topology, database and logging."""
