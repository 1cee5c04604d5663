//! The agent that runs custos's schedule (issue 18). This first step is the scheduling
//! logic alone: which runs are due, given a clock. It takes the clock as an argument, so
//! a simulated week runs in milliseconds; the process around it (jobs from custos.toml,
//! state, metrics, signals) is still to come.

pub mod schedule;
