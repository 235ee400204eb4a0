"""The sector lifecycle on the `fsm` engine: Lotus v1.11.3's state graph, handlers and chain."""
