//! What the benchmarks share.

/// The kernel's drop count for the UDP socket bound to `port` on 127.0.0.1
/// (the last column of /proc/net/udp).
pub fn kernel_drops(port: u16) -> u64 {
    let table = std::fs::read_to_string("/proc/net/udp").unwrap_or_default();
    let local = format!("0100007F:{port:04X}");
    table
        .lines()
        .filter(|line| line.split_whitespace().nth(1) == Some(local.as_str()))
        .filter_map(|line| line.split_whitespace().last().and_then(|d| d.parse::<u64>().ok()))
        .sum()
}
