//! PM2's `log_date_format` is a moment.js format (`YYYY-MM-DD HH:mm:ss Z`);
//! herd stamps lines with chrono, so the format is translated once, here.

/// moment.js tokens, longest first, with their strftime equivalents.
const TOKENS: &[(&str, &str)] = &[
    ("YYYY", "%Y"),
    ("MMMM", "%B"),
    ("dddd", "%A"),
    ("SSS", "%3f"),
    ("MMM", "%b"),
    ("ddd", "%a"),
    ("YY", "%y"),
    ("MM", "%m"),
    ("DD", "%d"),
    ("HH", "%H"),
    ("hh", "%I"),
    ("mm", "%M"),
    ("ss", "%S"),
    ("ZZ", "%z"),
    ("M", "%-m"),
    ("D", "%-d"),
    ("H", "%-H"),
    ("h", "%-I"),
    ("m", "%-M"),
    ("s", "%-S"),
    ("Z", "%:z"),
    ("A", "%p"),
    ("a", "%P"),
    ("X", "%s"),
];

/// The strftime format for a moment.js one: its tokens translated, text in
/// `[brackets]` and anything else kept as it is (`%` escaped).
pub fn to_strftime(moment: &str) -> String {
    let mut out = String::with_capacity(moment.len() * 2);
    let mut rest = moment;
    while let Some(c) = rest.chars().next() {
        if c == '['
            && let Some(end) = rest.find(']')
        {
            literal(&rest[1..end], &mut out);
            rest = &rest[end + 1..];
            continue;
        }
        match TOKENS.iter().find(|(t, _)| rest.starts_with(t)) {
            Some((t, f)) => {
                out.push_str(f);
                rest = &rest[t.len()..];
            }
            None => {
                literal(&rest[..c.len_utf8()], &mut out);
                rest = &rest[c.len_utf8()..];
            }
        }
    }
    out
}

fn literal(text: &str, out: &mut String) {
    for c in text.chars() {
        if c == '%' {
            out.push_str("%%");
        } else {
            out.push(c);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::to_strftime;

    #[test]
    fn pm2s_usual_formats_translate() {
        assert_eq!(to_strftime("YYYY-MM-DD HH:mm Z"), "%Y-%m-%d %H:%M %:z");
        assert_eq!(
            to_strftime("YYYY-MM-DDTHH:mm:ss.SSS"),
            "%Y-%m-%dT%H:%M:%S.%3f"
        );
        assert_eq!(to_strftime("DD/MMM/YYYY h:mm A"), "%d/%b/%Y %-I:%M %p");
        assert_eq!(to_strftime("[at] HH:mm [100%]"), "at %H:%M 100%%");
        assert_eq!(to_strftime("50% é"), "50%% é");
    }

    /// Whatever the input, chrono takes the result (no error item, which
    /// would make a stamp fail).
    #[test]
    fn any_format_gives_chrono_a_valid_one() {
        for f in [
            "%",
            "[",
            "]",
            "%%Y",
            "YYYYY",
            "[unclosed",
            "\u{1F600}Q",
            "",
            "%-",
        ] {
            let s = to_strftime(f);
            assert!(
                chrono::format::StrftimeItems::new(&s).all(|i| i != chrono::format::Item::Error),
                "{f:?} → {s:?}"
            );
        }
    }
}
