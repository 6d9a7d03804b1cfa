//! Text shown to people: ids made safe for terminals and logs.

/// `id` as it may be shown in a terminal or a log line: control characters
/// (which a server refuses in ids, but a client may meet elsewhere) are
/// escaped as `\n`, `\u{1b}` and so on, and so is a backslash.
pub fn printable(id: &str) -> std::borrow::Cow<'_, str> {
    if !id.chars().any(|c| c.is_control() || c == '\\') {
        return std::borrow::Cow::Borrowed(id);
    }
    let mut shown = String::with_capacity(id.len() + 8);
    for c in id.chars() {
        if c.is_control() || c == '\\' {
            shown.extend(c.escape_default());
        } else {
            shown.push(c);
        }
    }
    std::borrow::Cow::Owned(shown)
}
