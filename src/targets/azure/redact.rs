//! Keeps secrets out of messages: a SAS's signature (`sig=`), and anything that looks like a bearer token, are
//! replaced before a message is printed, logged or stored. Errors from HTTP libraries can quote the request URL
//! (SAS included), so every Azure error goes through `redact`.

/// Query keys whose values are secrets.
const SECRET_KEYS: [&str; 2] = ["sig=", "Signature="];

/// `text` with SAS signatures and bearer tokens replaced by `REDACTED`.
pub fn redact(text: &str) -> String {
    let mut out = text.to_string();
    for key in SECRET_KEYS {
        let mut from = 0;
        while let Some(pos) = out[from..].find(key) {
            let start = from + pos + key.len();
            let end = out[start..]
                .find(|c: char| c == '&' || c == '"' || c == '\'' || c == ')' || c.is_whitespace())
                .map_or(out.len(), |e| start + e);
            out.replace_range(start..end, "REDACTED");
            from = start + "REDACTED".len();
        }
    }
    // Every bearer token, not only the first; the search goes on after each replacement.
    let mut from = 0;
    while let Some(pos) = out[from..].to_ascii_lowercase().find("bearer ") {
        let start = from + pos + "bearer ".len();
        let end = out[start..]
            .find(|c: char| c == '"' || c == '\'' || c == ',' || c.is_whitespace())
            .map_or(out.len(), |e| start + e);
        out.replace_range(start..end, "REDACTED");
        from = start + "REDACTED".len();
    }
    out
}

/// A SAS URL as it may be shown: scheme, host and path only.
pub fn url_without_query(url: &str) -> String {
    match url.split_once('?') {
        Some((base, _)) => base.to_string(),
        None => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn removes_signatures() {
        let s = "error sending request for url (https://a.blob/x/y?sv=2025&sig=abc%2Bdef&se=1) and sig=zzz";
        let r = redact(s);
        assert!(!r.contains("abc") && !r.contains("zzz"), "{r}");
        assert!(r.contains("sig=REDACTED&se=1)"), "{r}");
        assert_eq!(
            redact("Authorization: Bearer eyJ0eXAi.x.y done"),
            "Authorization: Bearer REDACTED done"
        );
        assert_eq!(url_without_query("https://h/p?sig=1"), "https://h/p");
        assert_eq!(
            redact("first Bearer aaa.bbb.ccc then bearer ddd.eee, and BEARER fff"),
            "first Bearer REDACTED then bearer REDACTED, and BEARER REDACTED"
        );
    }
}
