//! User text that may reach a terminal (job names, commands, reasons, accounts, worker
//! names): what is refused at the door and how the client shows the rest, so one user's
//! text cannot move another's cursor, retitle their window or reorder what follows.

/// The longest job name, in bytes.
pub const MAX_NAME_BYTES: usize = 256;

/// Characters that steer a terminal rather than print: C0 and C1 controls, DEL, and the
/// bidirectional embeddings, overrides, isolates and marks (which reorder the rest of
/// the line).
pub fn is_unprintable(c: char) -> bool {
    c.is_control() || matches!(c, '\u{061c}' | '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// Checks a short piece of text a user names something with (`what`: "the job name"):
/// not blank, at most `max` bytes, nothing unprintable.
pub fn check_label(what: &str, s: &str, max: usize) -> Result<(), String> {
    if s.trim().is_empty() {
        return Err(format!("{what} is empty"));
    }
    if s.len() > max {
        return Err(format!("{what} is {} bytes long; the most allowed is {max}", s.len()));
    }
    if let Some((at, c)) = s.char_indices().find(|(_, c)| is_unprintable(*c)) {
        return Err(format!("{what} has a control character ({}) at byte {at}: use printable text", escape_char(c)));
    }
    Ok(())
}

fn escape_char(c: char) -> String {
    match c {
        '\n' => "\\n".into(),
        '\r' => "\\r".into(),
        '\t' => "\\t".into(),
        c if (c as u32) < 0x100 => format!("\\x{:02x}", c as u32),
        c => format!("\\u{{{:x}}}", c as u32),
    }
}

/// `s` with every unprintable character written as an escape (`\x1b`, `\n`, `\u{202e}`),
/// for tables, `status` and error lines; `--json` and job output are never escaped.
pub fn escape(s: &str) -> std::borrow::Cow<'_, str> {
    if !s.chars().any(is_unprintable) {
        return std::borrow::Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if is_unprintable(c) {
            out.push_str(&escape_char(c));
        } else {
            out.push(c);
        }
    }
    std::borrow::Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_what_steers_a_terminal() {
        assert_eq!(escape("plain café"), "plain café");
        assert_eq!(escape("\x1b]0;t\x07\x1b[2J"), "\\x1b]0;t\\x07\\x1b[2J");
        assert_eq!(escape("a\nb\tc\r\x7f\u{9b}"), "a\\nb\\tc\\r\\x7f\\x9b");
        assert_eq!(escape("abc\u{202e}fed"), "abc\\u{202e}fed");
    }

    #[test]
    fn labels_are_short_printable_text() {
        assert!(check_label("the job name", "train resnet-50 (run 3)", MAX_NAME_BYTES).is_ok());
        assert!(check_label("the job name", &"é".repeat(128), MAX_NAME_BYTES).is_ok());
        let long = check_label("the job name", &"x".repeat(257), MAX_NAME_BYTES).expect_err("refused");
        assert!(long.contains("257") && long.contains("256"), "{long}");
        for bad in ["a\x1bb", "tab\t", "\u{202e}", "nul\0"] {
            let e = check_label("the job name", bad, MAX_NAME_BYTES).expect_err("refused");
            assert!(e.contains("control character") && !e.contains(|c: char| is_unprintable(c)), "{e}");
        }
        assert!(check_label("the job name", " ", MAX_NAME_BYTES).is_err());
    }
}
