//! Shared by daxd's measuring and checking tools: the power-cut suite's block format and
//! its checker ([`cut`]).

pub mod cut;
