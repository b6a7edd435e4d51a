//! Crash and rebalance tests of the stateful processors and the e-mail worker, kept in
//! one test binary so that libtest runs them side by side: each spends much of its wall
//! time waiting on the broker (group rebalances, session timeouts after a SIGKILL), not
//! on the CPU. Each test starts its own embedded broker, ports and directories.
//!
//! libtest starts them in name order, two at a time on two cores: the arbiter's and the
//! e-mail worker's first, then the identity and profile tests as slots free up.

mod arbiter;
mod delivery;
mod identity;
mod profile;
