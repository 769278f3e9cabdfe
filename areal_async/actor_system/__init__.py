"""The actor system: the controller's admission under the staleness rule, the group ledger, the msgpack wire
format, the sharded replay queue, the trajectory log, the services workers and learner share, and the
torch.distributed groups of a Ray run."""
