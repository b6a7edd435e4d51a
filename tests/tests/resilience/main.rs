//! Crash and rebalance tests of the stateful processors, kept in one test binary so
//! that libtest runs them side by side: each spends much of its wall time waiting on
//! the broker (group rebalances, session timeouts after a SIGKILL), not on the CPU.
//! Each test starts its own embedded broker, ports and directories.

mod arbiter;
mod identity;
mod profile;
