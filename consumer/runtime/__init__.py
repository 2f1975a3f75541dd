"""The runtime: fetch loop, batches, stored offsets, rebalances."""
