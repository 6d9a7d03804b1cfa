//! The binary's rooms: flags (`args`), one file per subcommand (`serve`,
//! `beat`, `status`, `keys`) and the text rendering of `status` (`render`).

pub(crate) mod args;
pub(crate) mod beat;
pub(crate) mod fleet;
pub(crate) mod keys;
pub(crate) mod render;
pub(crate) mod serve;
pub(crate) mod status;
pub(crate) mod watch;
