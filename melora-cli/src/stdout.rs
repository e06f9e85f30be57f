//! Standard output that a closed pipe ends quietly. `print!` panics when the
//! reader has gone (`melora study-plan | head -1`); [`out!`](crate::out) and
//! [`outln!`](crate::outln) return an error instead, [`Closed`] for a
//! closed pipe, on which `melora` ends with success, as ripgrep does.

use std::fmt;
use std::io::{self, Write};

/// The reader of standard output has gone: nothing failed, there is no one
/// left to write to.
#[derive(Debug)]
pub struct Closed;

impl fmt::Display for Closed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("standard output was closed")
    }
}

impl std::error::Error for Closed {}

/// Writes `args` to standard output: [`Closed`] if its reader has gone,
/// any other failure with its cause.
pub fn write(args: fmt::Arguments<'_>) -> anyhow::Result<()> {
    io::stdout().lock().write_fmt(args).map_err(|e| match e.kind() {
        io::ErrorKind::BrokenPipe => anyhow::Error::new(Closed),
        _ => anyhow::Error::new(e).context("writing to standard output"),
    })
}

/// `print!` that returns [`write`]'s error instead of panicking.
#[macro_export]
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::stdout::write(format_args!($($arg)*))
    };
}

/// `println!` that returns [`write`]'s error instead of panicking.
#[macro_export]
macro_rules! outln {
    () => {
        $crate::stdout::write(format_args!("\n"))
    };
    ($($arg:tt)*) => {
        $crate::stdout::write(format_args!("{}\n", format_args!($($arg)*)))
    };
}
