#!/bin/sh
# Flash and RAM of the firmware, split by where the code comes from, as the
# symbols' names say: BLAKE3; the presence protocol (wire, auth, postcard,
# serde, the C ABI); Rust's panic and formatting machinery (kept by the
# crates' bounds checks and unwraps, never run); and the rest (the C
# program, start-up, memcpy and memset). With LTO, what Rust inlined into
# the exported functions counts as protocol.
elf=$1
arm-none-eabi-nm -S --size-sort -C -t d "$elf" | awk '
  NF >= 4 && $3 ~ /^[tTrRdDbBW]$/ {
    size = $2 + 0; name = $4; for (i = 5; i <= NF; i++) name = name " " $i
    part = "C program, start-up, memcpy/memset"
    if (name ~ /blake3|arrayvec/) part = "BLAKE3"
    else if (name ~ /fmt|panic|unwrap_failed|slice_index|len_mismatch|do_count_chars|Debug|Display|PadAdapter/) part = "Rust panic and formatting code"
    else if (name ~ /presence|postcard|serde|from_utf8/) part = "presence protocol (wire, auth, C ABI)"
    where = ($3 ~ /[tTrRW]/) ? "flash" : "ram"
    total[where "|" part] += size
  }
  END { for (k in total) { split(k, f, "|"); printf "  %-5s %5d bytes  %s\n", f[1], total[k], f[2] } }
' | sort -k1,1 -k2,2nr
# What no symbol names: mostly the merged string constants (panic
# locations: source file paths) that the panic code above refers to.
flash=$(arm-none-eabi-size -A "$elf" | awk '$1 == ".vectors" || $1 == ".text" || $1 == ".rodata" || $1 == ".data" { s += $2 } END { print s }')
named=$(arm-none-eabi-nm -S -t d "$elf" | awk 'NF >= 4 && $3 ~ /^[tTrRW]$/ { s += $2 } END { print s }')
printf "  %-5s %5d bytes  %s\n" flash $((flash - named)) "unnamed read-only data (panic locations and messages)"
printf "  %-5s %5d bytes  %s\n" flash "$flash" "in all"
