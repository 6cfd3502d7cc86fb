"""Process groups and communication: groups created once, the one all-to-all helper, the replica
gradient sync."""

from ep_megatron.parallel.groups import DistEnv, ParallelGroups, build_groups, check_ep_size, init_distributed

__all__ = ["DistEnv", "ParallelGroups", "build_groups", "check_ep_size", "init_distributed"]
