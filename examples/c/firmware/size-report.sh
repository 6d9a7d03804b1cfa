#!/bin/sh
# Flash and RAM of the firmware, split by where the code comes from: the
# symbols' names say it (BLAKE3's compression; the presence protocol,
# postcard and serde; the rest: the C program, start-up, the C library and
# Rust's core). With LTO the library's exported functions hold what was
# inlined into them, so "protocol" includes the glue Rust inlined there.
elf=$1
arm-none-eabi-nm -S --size-sort -C "$elf" | awk '
  $3 ~ /^[tTrRdDbB]$/ {
    size = strtonum("0x" $2); name = $4; for (i = 5; i <= NF; i++) name = name " " $i
    part = "C program, start-up, libc, core"
    if (name ~ /blake3|compress|Hasher|ChunkState/) part = "BLAKE3"
    else if (name ~ /presence|postcard|serde|wire|auth/) part = "presence protocol (wire, auth, C ABI)"
    where = ($3 ~ /[tTrR]/) ? "flash" : "ram"
    total[where " " part] += size
  }
  END { for (k in total) printf "  %-6s %6d bytes  %s\n", substr(k, 1, index(k, " ") - 1), total[k], substr(k, index(k, " ") + 1) }
' | sort
