//! Consul's `?filter=` expressions (the go-bexpr language), in the forms clients use:
//! `Sel == "v"`, `!=`, `contains`, `not contains`, `"v" in Sel`, `"v" not in Sel`,
//! `Sel is empty`, `Sel is not empty`, joined by `and`, `or`, `not` and parentheses.
//! Selectors are dotted paths into the JSON of each result (`Service.Meta.env`,
//! `Service.Tags`, `Checks.Status`); a path through an array matches if any element does.

use serde_json::Value;

const MAX_FILTER_LEN: usize = 2048;
const MAX_DEPTH: usize = 32;

#[derive(Debug, Clone, PartialEq)]
pub enum Filter {
    And(Box<Filter>, Box<Filter>),
    Or(Box<Filter>, Box<Filter>),
    Not(Box<Filter>),
    Eq(Vec<String>, String, bool),
    Contains(Vec<String>, String, bool),
    Empty(Vec<String>, bool),
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Word(String),
    Str(String),
    Op(&'static str),
    Open,
    Close,
}

fn lex(s: &str) -> Result<Vec<Tok>, String> {
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    while let Some(&c) = chars.peek() {
        match c {
            c if c.is_whitespace() => {
                chars.next();
            }
            '(' => {
                chars.next();
                out.push(Tok::Open);
            }
            ')' => {
                chars.next();
                out.push(Tok::Close);
            }
            '=' | '!' => {
                chars.next();
                if chars.next() != Some('=') {
                    return Err(format!("expected '{c}=' "));
                }
                out.push(Tok::Op(if c == '=' { "==" } else { "!=" }));
            }
            '"' | '`' => {
                chars.next();
                let mut v = String::new();
                loop {
                    match chars.next() {
                        None => return Err("unterminated string".into()),
                        Some('\\') if c == '"' => v.extend(chars.next()),
                        Some(x) if x == c => break,
                        Some(x) => v.push(x),
                    }
                }
                out.push(Tok::Str(v));
            }
            _ => {
                let mut w = String::new();
                while let Some(&x) = chars.peek() {
                    if x.is_whitespace() || matches!(x, '(' | ')' | '=' | '!' | '"' | '`') {
                        break;
                    }
                    w.push(x);
                    chars.next();
                }
                out.push(Tok::Word(w));
            }
        }
    }
    Ok(out)
}

struct Parser {
    toks: Vec<Tok>,
    pos: usize,
    depth: usize,
}

impl Parser {
    fn peek_word(&self, w: &str) -> bool {
        matches!(self.toks.get(self.pos), Some(Tok::Word(x)) if x == w)
    }

    fn next(&mut self) -> Option<Tok> {
        let t = self.toks.get(self.pos).cloned();
        self.pos += 1;
        t
    }

    fn or(&mut self) -> Result<Filter, String> {
        let mut left = self.and()?;
        while self.peek_word("or") {
            self.pos += 1;
            left = Filter::Or(Box::new(left), Box::new(self.and()?));
        }
        Ok(left)
    }

    fn and(&mut self) -> Result<Filter, String> {
        let mut left = self.unary()?;
        while self.peek_word("and") {
            self.pos += 1;
            left = Filter::And(Box::new(left), Box::new(self.unary()?));
        }
        Ok(left)
    }

    fn unary(&mut self) -> Result<Filter, String> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return Err("expression nests too deeply".into());
        }
        let out = if self.peek_word("not") {
            self.pos += 1;
            Filter::Not(Box::new(self.unary()?))
        } else if self.toks.get(self.pos) == Some(&Tok::Open) {
            self.pos += 1;
            let inner = self.or()?;
            if self.next() != Some(Tok::Close) {
                return Err("missing ')'".into());
            }
            inner
        } else {
            self.matcher()?
        };
        self.depth -= 1;
        Ok(out)
    }

    fn value(&mut self) -> Result<String, String> {
        match self.next() {
            Some(Tok::Str(s) | Tok::Word(s)) => Ok(s),
            other => Err(format!("expected a value, found {other:?}")),
        }
    }

    fn selector(&mut self) -> Result<Vec<String>, String> {
        match self.next() {
            Some(Tok::Word(w)) if !w.is_empty() => Ok(w.split('.').map(str::to_string).collect()),
            other => Err(format!("expected a selector, found {other:?}")),
        }
    }

    fn matcher(&mut self) -> Result<Filter, String> {
        // "value" [not] in Selector
        if matches!(self.toks.get(self.pos), Some(Tok::Str(_))) || matches!(self.toks.get(self.pos + 1), Some(Tok::Word(w)) if w == "in" || w == "not") {
            let save = self.pos;
            let v = self.value()?;
            let negate = self.peek_word("not");
            if negate {
                self.pos += 1;
            }
            if self.peek_word("in") {
                self.pos += 1;
                return Ok(Filter::Contains(self.selector()?, v, negate));
            }
            self.pos = save;
        }
        let sel = self.selector()?;
        match self.next() {
            Some(Tok::Op("==")) => Ok(Filter::Eq(sel, self.value()?, false)),
            Some(Tok::Op("!=")) => Ok(Filter::Eq(sel, self.value()?, true)),
            Some(Tok::Word(w)) if w == "contains" => Ok(Filter::Contains(sel, self.value()?, false)),
            Some(Tok::Word(w)) if w == "is" => {
                let negate = self.peek_word("not");
                if negate {
                    self.pos += 1;
                }
                match self.next() {
                    Some(Tok::Word(w)) if w == "empty" => Ok(Filter::Empty(sel, negate)),
                    other => Err(format!("expected 'empty', found {other:?}")),
                }
            }
            Some(Tok::Word(w)) if w == "not" => match self.next() {
                Some(Tok::Word(w)) if w == "contains" => Ok(Filter::Contains(sel, self.value()?, true)),
                other => Err(format!("expected 'contains' after 'not', found {other:?}")),
            },
            other => Err(format!("expected an operator (==, !=, contains, in, is empty) after {}, found {other:?}", sel.join("."))),
        }
    }
}

impl Filter {
    pub fn parse(s: &str) -> Result<Self, String> {
        if s.len() > MAX_FILTER_LEN {
            return Err(format!("longer than {MAX_FILTER_LEN} bytes"));
        }
        let mut p = Parser { toks: lex(s)?, pos: 0, depth: 0 };
        let f = p.or()?;
        if let Some(t) = p.toks.get(p.pos) {
            return Err(format!("unexpected {t:?}"));
        }
        Ok(f)
    }

    pub fn matches(&self, v: &Value) -> bool {
        match self {
            Self::And(a, b) => a.matches(v) && b.matches(v),
            Self::Or(a, b) => a.matches(v) || b.matches(v),
            Self::Not(a) => !a.matches(v),
            Self::Eq(sel, want, negate) => resolve(v, sel).iter().any(|x| scalar(x).as_deref() == Some(want.as_str())) != *negate,
            Self::Contains(sel, want, negate) => resolve(v, sel).iter().any(|x| contains(x, want)) != *negate,
            Self::Empty(sel, negate) => resolve(v, sel).iter().all(|x| is_empty(x)) != *negate,
        }
    }
}

/// Every value the selector reaches; arrays met along the way fan out.
fn resolve<'a>(v: &'a Value, sel: &[String]) -> Vec<&'a Value> {
    let Some((first, rest)) = sel.split_first() else { return vec![v] };
    match v {
        Value::Object(m) => m.get(first).map(|x| resolve(x, rest)).unwrap_or_default(),
        Value::Array(items) => items.iter().flat_map(|x| resolve(x, sel)).collect(),
        _ => Vec::new(),
    }
}

fn scalar(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

fn contains(v: &Value, want: &str) -> bool {
    match v {
        Value::Array(items) => items.iter().any(|x| scalar(x).as_deref() == Some(want)),
        Value::Object(m) => m.contains_key(want),
        Value::String(s) => s.contains(want),
        _ => false,
    }
}

fn is_empty(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::String(s) => s.is_empty(),
        Value::Array(a) => a.is_empty(),
        Value::Object(m) => m.is_empty(),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn m(expr: &str, v: &Value) -> bool {
        Filter::parse(expr).unwrap_or_else(|e| panic!("{expr}: {e}")).matches(v)
    }

    #[test]
    fn common_forms() {
        let v = json!({"Service": {"Service": "web", "Tags": ["v1", "canary"], "Meta": {"env": "prod"}, "Port": 80},
                       "Checks": [{"Status": "passing"}, {"Status": "critical"}]});
        assert!(m(r#"Service.Meta.env == "prod""#, &v));
        assert!(m(r#"Service.Meta.env != staging"#, &v));
        assert!(m(r#""v1" in Service.Tags"#, &v));
        assert!(m(r#""v2" not in Service.Tags"#, &v));
        assert!(m(r#"Service.Tags contains canary and Service.Port == 80"#, &v));
        assert!(m(r#"Service.Tags not contains v3"#, &v));
        assert!(m(r#"not (Service.Meta.env == dev or Service.Service == api)"#, &v));
        assert!(m(r#"Checks.Status == critical"#, &v), "arrays match if any element does");
        assert!(m(r#"Service.Meta.missing is empty and Service.Tags is not empty"#, &v));
        assert!(!m(r#"Service.Meta.env == `dev`"#, &v));
    }

    #[test]
    fn errors_say_what_is_wrong() {
        assert!(Filter::parse("Service.Meta.env =").unwrap_err().contains("expected"));
        assert!(Filter::parse("(a == b").unwrap_err().contains(")"));
        assert!(Filter::parse("a == \"b").unwrap_err().contains("unterminated"));
        assert!(Filter::parse(&"(".repeat(100)).unwrap_err().contains("deeply"));
    }

    proptest! {
        #[test]
        fn arbitrary_filters_never_panic(s in "[a-zA-Z. =!\"`()]{0,80}") {
            if let Ok(f) = Filter::parse(&s) {
                let _ = f.matches(&json!({"a": {"b": [1, "x"]}}));
            }
        }
    }
}
