"""The audit consumer: stores each event of `orders.events` once, projects the orders read model."""
