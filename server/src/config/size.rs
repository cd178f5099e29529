//! Byte sizes as people write them: `8GiB`, `256 MiB`, `64MB`, `1048576`.

/// Parses a size: a number of bytes, or one with a unit (`KiB`, `MiB`, `GiB` are powers
/// of 1024; `KB`, `MB`, `GB` of 1000), for clap.
pub fn parse_bytes(text: &str) -> Result<u64, String> {
    text.trim()
        .parse::<bytesize::ByteSize>()
        .map(|b| b.as_u64())
        .map_err(|_| {
            format!(
                "{text:?} is not a size: write bytes, or a number with a unit such as 64MiB or 8GiB"
            )
        })
}

/// [`parse_bytes`] for a size held as `usize`.
pub fn parse_usize(text: &str) -> Result<usize, String> {
    let bytes = parse_bytes(text)?;
    usize::try_from(bytes).map_err(|_| format!("{text:?} is too large"))
}

/// A size as the README writes it (`256 MiB`).
pub fn display(bytes: u64) -> String {
    const UNITS: [(&str, u64); 4] = [
        ("TiB", 1 << 40),
        ("GiB", 1 << 30),
        ("MiB", 1 << 20),
        ("KiB", 1 << 10),
    ];
    for (unit, size) in UNITS {
        if bytes >= size && bytes.is_multiple_of(size) {
            return format!("{} {unit}", bytes / size);
        }
    }
    match UNITS.iter().find(|(_, size)| bytes >= *size) {
        Some((unit, size)) => format!("{:.1} {unit}", bytes as f64 / *size as f64),
        None => format!("{bytes} bytes"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_in_the_units_the_readme_writes() {
        assert_eq!(parse_bytes("8GiB"), Ok(8 << 30));
        assert_eq!(parse_bytes("256 MiB"), Ok(256 << 20));
        assert_eq!(parse_bytes("64MB"), Ok(64_000_000));
        assert_eq!(parse_bytes("1048576"), Ok(1 << 20));
        assert!(parse_bytes("lots").unwrap_err().contains("64MiB"));
        assert_eq!(display(256 << 20), "256 MiB");
        assert_eq!(display(1 << 30), "1 GiB");
        assert_eq!(display(1_500_000), "1.4 MiB");
        assert_eq!(display(12), "12 bytes");
    }
}
