//! Discover a LUN through the iSCSI transport and write, flush and read back one block:
//! `cargo run -p hvm-scsi --features iscsi --example iscsi_probe -- iscsi://HOST:PORT/IQN/LUN`.

use hvm_core::backend::Backend;
use hvm_core::LuId;
use hvm_scsi::iscsi::{IscsiOptions, IscsiTransport, IscsiUrl};
use hvm_scsi::ArrayClient;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url: IscsiUrl = std::env::args()
        .nth(1)
        .ok_or("usage: iscsi_probe iscsi://HOST:PORT/IQN/LUN")?
        .parse()?;
    let t = IscsiTransport::connect(&url, &IscsiOptions::default())?;
    let c = ArrayClient::new(t);
    let lu = LuId(u32::from(url.lun));
    println!("LUNs: {:?}", c.report_luns()?);
    println!("capacity: {} blocks", c.capacity(url.lun)?);
    println!("identity: {:?}", c.identity(lu)?);
    let block = [0x5au8; 512];
    c.write(lu, 7, &block, true)?;
    c.flush(lu)?;
    let mut back = [0u8; 512];
    c.read(lu, 7, &mut back)?;
    println!("read back equal: {}", back == block);
    match c.mode_select(lu, &[0x00, 0x01]) {
        Ok(()) => println!("MODE SELECT accepted"),
        Err(e) => println!("MODE SELECT: {e}"),
    }
    Ok(())
}
