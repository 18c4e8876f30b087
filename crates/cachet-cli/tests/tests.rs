//! Tests of the `cachet` binary, run as a user runs it: a child process whose
//! exit status, stdout and stderr are checked.

mod bad_input;
mod lab;
mod util;
