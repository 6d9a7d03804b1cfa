//! `presence keygen` and `presence derive-key`.

use std::io::{self, Write};
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use presence::auth;
use presence::keyfile::{KeyFile, to_hex};

use super::args::{DeriveKeyArgs, KeygenArgs};

pub(crate) fn keygen(args: KeygenArgs) -> Result<ExitCode> {
    let master = presence::keyfile::generate_master().context("cannot read the OS random source")?;
    KeyFile::Master(master).write_new(&args.out)?;
    say!("wrote a new master key to {} (mode 0600)", args.out.display())?;
    say!("derive device keys with: presence derive-key --key-file {} --id DEVICE", args.out.display())?;
    Ok(ExitCode::SUCCESS)
}

pub(crate) fn derive_key(args: DeriveKeyArgs) -> Result<ExitCode> {
    let master = match KeyFile::read(&args.key_file)? {
        KeyFile::Master(master) => master,
        other => {
            bail!("{}: derive-key needs the master key, not {}", args.key_file.display(), other.kind_phrase())
        }
    };
    if args.http_token {
        say!("{}", to_hex(&auth::http_token(&auth::operator_key(&master))))?;
        return Ok(ExitCode::SUCCESS);
    }
    let file = match &args.id {
        Some(id) => {
            presence::wire::check_id(id).map_err(|e| anyhow::anyhow!("--id: {e}"))?;
            KeyFile::Device(auth::device_key(&master, id), id.clone())
        }
        None => KeyFile::Operator(auth::operator_key(&master)),
    };
    match &args.out {
        Some(path) => {
            file.write_new(path)?;
            say!("wrote the {} key to {} (mode 0600)", file.kind(), path.display())?;
        }
        None => match &file {
            KeyFile::Device(key, _) | KeyFile::Operator(key) => say!("{}", to_hex(key))?,
            KeyFile::Master(_) => {}
        },
    }
    Ok(ExitCode::SUCCESS)
}
