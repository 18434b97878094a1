//! Rank placements for the data-parallel tests.

use llada::train::dist::DistEnv;

/// Rank `rank` of `world` on this machine, rendezvous at 127.0.0.1:`port`.
pub fn rank_env(rank: usize, world: usize, port: u16) -> DistEnv {
    DistEnv {
        rank,
        world,
        local_rank: rank,
        master_addr: "127.0.0.1".into(),
        master_port: port,
        source: "test",
    }
}
