"""The command bridge: consumes `orders.commands`, starts and signals order workflows."""
