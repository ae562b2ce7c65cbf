//! The `--tokens-file`: either one token per line (each its own account),
//! or TOML naming accounts, each with its tokens (as hashes), reserved
//! subdomains, tunnel limit and admin flag. See docs/accounts.md.

use std::collections::HashMap;
use std::path::Path;

use ferry_common::subdomain::Subdomain;
use serde::Deserialize;

use super::{Account, AccountId, Token, TokenHash};

/// The longest account name.
const MAX_NAME: usize = 64;

/// A TOML tokens file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Accounts {
    #[serde(default)]
    account: Vec<Entry>,
}

/// One `[[account]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    name: String,
    tokens: Vec<String>,
    #[serde(default)]
    subdomains: Vec<String>,
    max_tunnels: Option<usize>,
    #[serde(default)]
    admin: bool,
}

/// Reads and checks the tokens file at `path`.
pub fn load(path: &Path) -> Result<Vec<Account>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|err| format!("cannot read --tokens-file {}: {err}", path.display()))?;
    parse(&text).map_err(|err| format!("--tokens-file {}: {err}", path.display()))
}

/// The accounts of a tokens file's `text`. It is TOML when a line starts
/// with `[`, as `[[account]]` does; otherwise one token per line, blank
/// lines and `#` comments skipped.
pub fn parse(text: &str) -> Result<Vec<Account>, String> {
    let is_toml = text.lines().any(|line| line.trim_start().starts_with('['));
    let accounts = if is_toml {
        parse_toml(text)?
    } else {
        parse_lines(text)?
    };
    if accounts.is_empty() {
        return Err("it holds no token: add one, or leave --tokens-file out".to_owned());
    }
    let mut owners: HashMap<TokenHash, &AccountId> = HashMap::new();
    for account in &accounts {
        for token in &account.tokens {
            if let Some(other) = owners.insert(*token.hash(), &account.id) {
                return Err(format!(
                    "the same token is listed twice (in {other} and {}): give each token to one account, once",
                    account.id
                ));
            }
        }
    }
    Ok(accounts)
}

fn parse_lines(text: &str) -> Result<Vec<Account>, String> {
    let mut accounts = Vec::new();
    // A token on two lines is one account listed twice, not a conflict:
    // warned of, as earlier versions took it.
    let mut seen: HashMap<TokenHash, usize> = HashMap::new();
    for (number, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if line.contains(char::is_whitespace) || line.contains('"') {
            return Err(format!(
                "line {} is neither a token (one per line, no spaces) nor part of a TOML file of [[account]] tables",
                number + 1
            ));
        }
        let token = match TokenHash::parse(line) {
            Some(hash) => Token::hashed(hash, AccountId::of_hash(&hash)),
            None if line.starts_with(TokenHash::PREFIX) => {
                return Err(format!(
                    "line {}: a hash is `sha256:` and 64 hex digits, as `ferry-relay hash-token` prints",
                    number + 1
                ))
            }
            None => Token::new(line),
        };
        if let Some(first) = seen.get(token.hash()) {
            tracing::warn!(
                "tokens file: line {} repeats the token of line {first}; the repeat is ignored",
                number + 1
            );
            continue;
        }
        seen.insert(*token.hash(), number + 1);
        accounts.push(Account::of_token(token));
    }
    Ok(accounts)
}

fn parse_toml(text: &str) -> Result<Vec<Account>, String> {
    let file: Accounts = toml::from_str(text).map_err(|err| format!("not valid: {err}"))?;
    let mut names = HashMap::new();
    let mut reserved: HashMap<Subdomain, String> = HashMap::new();
    let mut accounts = Vec::new();
    for entry in file.account {
        let name = entry.name;
        let valid = !name.is_empty()
            && name.len() <= MAX_NAME
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
        if !valid {
            return Err(format!(
                "account name `{name}` must be 1 to {MAX_NAME} of a-z, 0-9, `-` and `_`"
            ));
        }
        if names.insert(name.clone(), ()).is_some() {
            return Err(format!(
                "two accounts are named `{name}`: names must be unique"
            ));
        }
        let id = AccountId::named(&name);
        if entry.tokens.is_empty() {
            return Err(format!(
                "account `{name}` has no token: add one from `ferry-relay hash-token`"
            ));
        }
        let mut tokens = Vec::new();
        for token in &entry.tokens {
            let hash = TokenHash::parse(token.trim()).ok_or_else(|| {
                format!(
                    "account `{name}`: a token must be given as its hash, `sha256:` and 64 hex digits: run `ferry-relay hash-token` and paste what it prints"
                )
            })?;
            tokens.push(Token::hashed(hash, id.clone()));
        }
        let mut subdomains = Vec::new();
        for wanted in &entry.subdomains {
            let subdomain =
                Subdomain::parse(wanted).map_err(|err| format!("account `{name}`: {err}"))?;
            if let Some(other) = reserved.insert(subdomain.clone(), name.clone()) {
                return Err(format!(
                    "the subdomain `{subdomain}` is reserved by both `{other}` and `{name}`: give it to one account"
                ));
            }
            subdomains.push(subdomain);
        }
        if entry.max_tunnels == Some(0) {
            return Err(format!(
                "account `{name}`: max_tunnels must be at least 1 (remove the account to shut it out)"
            ));
        }
        accounts.push(Account {
            id,
            tokens,
            subdomains,
            max_tunnels: entry.max_tunnels,
            admin: entry.admin,
        });
    }
    Ok(accounts)
}

#[cfg(test)]
mod tests {
    use super::parse;
    use crate::accounts::{AccountId, TokenHash};

    fn hash(secret: &str) -> String {
        TokenHash::of(secret).to_string()
    }

    #[test]
    fn the_line_form_keeps_working_and_takes_hashes() {
        let text = format!("# team\n\nplain-token\n{}\n", hash("hashed-token"));
        let accounts = parse(&text).unwrap();
        assert_eq!(accounts.len(), 2);
        assert_eq!(accounts[0].id, AccountId::of_token("plain-token"));
        // The same token again, plain or hashed, is the same account: kept
        // once, as earlier versions did.
        let twice = format!("{text}plain-token\n{}\n", hash("plain-token"));
        let again = parse(&twice).unwrap();
        assert_eq!(again.len(), 2);
        assert_eq!(again[0].id, accounts[0].id);
        assert!(accounts[0].tokens[0].matches("plain-token"));
        // A hashed line is the same account as the plain token would be.
        assert_eq!(accounts[1].id, AccountId::of_token("hashed-token"));
        assert!(accounts[1].tokens[0].matches("hashed-token"));
        assert!(!accounts[1].tokens[0].matches(&hash("hashed-token")));
    }

    #[test]
    fn named_accounts_keep_their_id_across_tokens() {
        let text = format!(
            "[[account]]\nname = \"alice\"\ntokens = [\"{}\", \"{}\"]\nsubdomains = [\"alice\", \"Alice-API\"]\nmax_tunnels = 5\nadmin = true\n\n[[account]]\nname = \"bob\"\ntokens = [\"{}\"]\n",
            hash("old"),
            hash("new"),
            hash("bob")
        );
        let accounts = parse(&text).unwrap();
        let alice = &accounts[0];
        assert_eq!(alice.id.as_str(), "user_alice");
        assert!(alice.tokens.iter().all(|t| t.account() == &alice.id));
        assert!(alice.tokens[0].matches("old") && alice.tokens[1].matches("new"));
        let names: Vec<_> = alice.subdomains.iter().map(|s| s.as_str()).collect();
        assert_eq!(names, ["alice", "alice-api"]);
        assert_eq!(alice.max_tunnels, Some(5));
        assert!(alice.admin);
        assert!(!accounts[1].admin && accounts[1].subdomains.is_empty());
        assert_eq!(accounts[1].max_tunnels, None);
    }

    #[test]
    fn the_documented_examples_parse() {
        let doc = include_str!("../../../docs/accounts.md");
        let block = |fence: &str| {
            let start = doc.find(fence).expect("the example is there") + fence.len();
            let end = start + doc[start..].find("```").expect("the example ends");
            &doc[start..end]
        };
        let accounts = parse(block("```toml\n")).unwrap();
        assert_eq!(accounts.len(), 2);
        assert!(accounts[1].admin && accounts[0].max_tunnels == Some(5));
        assert_eq!(parse(block("```text\n")).unwrap().len(), 2);
    }

    #[test]
    fn mistakes_are_named() {
        let h = hash("a");
        let cases = [
            ("", "holds no token"),
            ("# only a comment\n", "holds no token"),
            ("name = \"alice\"\n", "line 1 is neither a token"),
            ("sha256:12ab\n", "line 1: a hash is"),
            ("[[account]]\nname = \"x\"\ntokens = [\"plain\"]\n", "account `x`: a token must be given as its hash"),
            (&format!("[[account]]\nname = \"x\"\ntokens = [\"{h}\"]\nadmn = true\n"), "unknown field `admn`"),
            (&format!("[[account]]\nname = \"x\"\ntokens = [\"{h}\"]\n[[account]]\nname = \"x\"\ntokens = [\"{}\"]\n", hash("b")), "two accounts are named `x`"),
            (&format!("[[account]]\nname = \"x\"\ntokens = [\"{h}\"]\n[[account]]\nname = \"y\"\ntokens = [\"{h}\"]\n"), "the same token is listed twice"),
            (&format!("[[account]]\nname = \"x\"\ntokens = [\"{h}\"]\nsubdomains = [\"shop\"]\n[[account]]\nname = \"y\"\ntokens = [\"{}\"]\nsubdomains = [\"shop\"]\n", hash("b")), "`shop` is reserved by both `x` and `y`"),
            (&format!("[[account]]\nname = \"x\"\ntokens = [\"{h}\"]\nsubdomains = [\"no_way\"]\n"), "account `x`: the subdomain `no_way` may only contain"),
            (&format!("[[account]]\nname = \"X Y\"\ntokens = [\"{h}\"]\n"), "account name `X Y` must be"),
            ("[[account]]\nname = \"x\"\ntokens = []\n", "account `x` has no token"),
            (&format!("[[account]]\nname = \"x\"\ntokens = [\"{h}\"]\nmax_tunnels = 0\n"), "max_tunnels must be at least 1"),
            ("[[account]\nname = 1\n", "not valid"),
        ];
        for (text, expected) in cases {
            let err = parse(text).expect_err(text);
            assert!(err.contains(expected), "{text:?}: {err}");
        }
    }
}
