// Markdown for model replies, rendered to an HTML string.
//
// The one rule that keeps the page safe: model text reaches the HTML only through escapeHtml().
// Block structure is read from the raw lines; every piece of text is escaped before any markup is
// put around it, and the markup itself is fixed strings (attribute values are escaped text or
// checked: http(s) link targets, [\w+#.-] language names, digits). The raw text is what the page
// stores and sends back to the model; this output is for display only.
//
// Covered: paragraphs (single newlines kept), # and underlined headings, - / 1. lists (nested by indent), > quotes,
// --- rules, | tables |, `code`, **bold**, *italic*, ~~strike~~, [links](https://…), bare https://
// links, and ``` fenced code blocks (also unterminated ones, while a reply streams) with a small
// keyword / string / comment / number highlighter.

const ESCAPES = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" };

export function escapeHtml(text) {
  return String(text).replace(/[&<>"']/g, (c) => ESCAPES[c]);
}

// ------------------------------------------------------------------------------------------------
// Code highlighting: split the raw code into tokens, escape each, wrap the interesting ones.

const WORDS = {
  python:
    "False None True and as assert async await break case class continue def del elif else except finally for " +
    "from global if import in is lambda match nonlocal not or pass raise return self try while with yield",
  js:
    "async await break case catch class const continue debugger default delete do else enum export extends false " +
    "finally for from function if implements import in instanceof interface let new null of private protected " +
    "public readonly return static super switch this throw true try type typeof undefined var void while yield",
  shell:
    "alias case cd do done echo elif else esac exit export fi for function if in local read return set shift " +
    "source then unset until while",
  sql:
    "add all alter and as asc between by case create delete desc distinct drop else end exists from group having " +
    "in index inner insert into is join key left like limit not null on or order outer primary right select set " +
    "table then union update values when where with",
  json: "true false null",
  c:
    "abstract auto bool boolean break byte case catch char chan class const continue default defer delete do " +
    "double else enum explicit extends extern false final float fn for func go goto if impl implements import " +
    "inline int interface let long loop map match mod mut namespace new nil null nullptr override package private " +
    "protected pub public range register return self short signed sizeof static string struct super switch " +
    "template this throw trait true try type typedef typename union unsigned use using var virtual void " +
    "volatile where while",
};
const KEYWORDS = Object.fromEntries(Object.entries(WORDS).map(([k, v]) => [k, new Set(v.split(" "))]));

const LANGUAGE_FAMILY = new Map(Object.entries({
  python: "python", py: "python", python3: "python", ipython: "python",
  javascript: "js", js: "js", jsx: "js", mjs: "js", typescript: "js", ts: "js", tsx: "js",
  bash: "shell", sh: "shell", shell: "shell", zsh: "shell", console: "shell", shellscript: "shell",
  sql: "sql", mysql: "sql", postgresql: "sql", sqlite: "sql",
  json: "json", jsonc: "json",
  text: "", txt: "", plaintext: "", plain: "", markdown: "", md: "", "": "",
})); // prettier-ignore

const STRING = String.raw`"(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*'`;
const NUMBER = String.raw`\b(?:0[xX][\da-fA-F_]+|\d[\d_]*(?:\.\d+)?(?:[eE][+-]?\d+)?)\b`;
const WORD = String.raw`[A-Za-z_$][\w$]*`;
const SLASH_COMMENT = String.raw`\/\/[^\n]*|\/\*[\s\S]*?(?:\*\/|$)`;

// Per family: [comment, string] patterns (an unterminated block comment / triple string runs to the end,
// which is what a half-streamed block looks like).
const FAMILY_PATTERNS = {
  python: [String.raw`#[^\n]*`, String.raw`[rRbBuUfF]{0,2}(?:"""[\s\S]*?(?:"""|$)|'''[\s\S]*?(?:'''|$)|${STRING})`],
  js: [SLASH_COMMENT, String.raw`${STRING}|\x60(?:[^\x60\\]|\\[\s\S])*(?:\x60|$)`],
  shell: [String.raw`(?:^|(?<=\s))#[^\n]*`, STRING],
  sql: [String.raw`--[^\n]*|\/\*[\s\S]*?(?:\*\/|$)`, STRING],
  json: [String.raw`(?!)`, STRING],
  c: [String.raw`${SLASH_COMMENT}|^[ \t]*#[^\n]*`, STRING],
};

const TOKENIZERS = {};
function tokenizer(family) {
  if (!TOKENIZERS[family]) {
    const [comment, string] = FAMILY_PATTERNS[family];
    TOKENIZERS[family] = new RegExp(`(${comment})|(${string})|(${NUMBER})|(${WORD})`, "gm");
  }
  return TOKENIZERS[family];
}

/** The code as escaped HTML with <span class="tok-…"> around keywords, strings, comments, numbers. */
export function highlight(code, language) {
  const lang = String(language || "").toLowerCase();
  const family = LANGUAGE_FAMILY.has(lang) ? LANGUAGE_FAMILY.get(lang) : "c"; // a Map: "constructor" is no language
  if (!family) return escapeHtml(code);
  const pattern = tokenizer(family);
  const keywords = KEYWORDS[family];
  const caseless = family === "sql";
  let html = "";
  let last = 0;
  pattern.lastIndex = 0;
  for (let m = pattern.exec(code); m; m = pattern.exec(code)) {
    if (m[0] === "") {
      pattern.lastIndex++;
      continue;
    }
    html += escapeHtml(code.slice(last, m.index));
    const text = escapeHtml(m[0]);
    let kind = m[1] ? "comment" : m[2] ? "string" : m[3] ? "number" : null;
    if (m[4]) {
      if (keywords.has(caseless ? m[4].toLowerCase() : m[4])) kind = "keyword";
      else if (code[pattern.lastIndex] === "(") kind = "call";
    }
    html += kind ? `<span class="tok-${kind}">${text}</span>` : text;
    last = pattern.lastIndex;
  }
  return html + escapeHtml(code.slice(last));
}

// ------------------------------------------------------------------------------------------------
// Inline markup. Code spans and links are set aside as placeholders (\u0000N\u0000: renderMarkdown
// turns every NUL of the source into U+FFFD first), so emphasis rules cannot reach into them.

const CODE_SPAN = /(`+)([^`]|[^`][\s\S]*?[^`])\1(?!`)/g;
const LINK = /\[([^\]\n]+)\]\((https?:\/\/[^\s)]+)\)/g;
const BARE_URL = /\bhttps?:\/\/(?:(?!&(?:lt|gt|quot|#39);)[^\s\u0000])+/g;
const TRAILING_PUNCTUATION = /(?:[.,:;!?)\]]|&(?:quot|#39);)+$/;

function anchor(href, label) {
  return `<a href="${href}" target="_blank" rel="noopener noreferrer">${label}</a>`;
}

function renderInline(source) {
  const held = [];
  const hold = (html) => `\u0000${held.push(html) - 1}\u0000`;
  let s = String(source).replace(CODE_SPAN, (_, ticks, code) => hold(`<code>${escapeHtml(code)}</code>`));
  s = escapeHtml(s); // from here on the text is escaped; only our markup is added to it
  s = s.replace(LINK, (_, label, href) => hold(anchor(href, label)));
  s = s.replace(BARE_URL, (url) => {
    const tail = url.match(TRAILING_PUNCTUATION);
    const href = tail ? url.slice(0, -tail[0].length) : url;
    return hold(anchor(href, href)) + (tail ? tail[0] : "");
  });
  s = s
    .replace(/\*\*(?=\S)([\s\S]*?\S)\*\*/g, "<strong>$1</strong>")
    .replace(/(^|[^\w])__(?=\S)([\s\S]*?\S)__(?!\w)/g, "$1<strong>$2</strong>")
    .replace(/(^|[^\w*])\*(?=[^\s*])([^*\n]*?[^\s*])\*(?![\w*])/g, "$1<em>$2</em>")
    .replace(/(^|[^\w])_(?=[^\s_])([^_\n]*?[^\s_])_(?!\w)/g, "$1<em>$2</em>")
    .replace(/~~(?=\S)([\s\S]*?\S)~~/g, "<del>$1</del>")
    .replace(/\n/g, "<br>");
  while (s.includes("\u0000")) s = s.replace(/\u0000(\d+)\u0000/g, (_, n) => held[Number(n)]); // held ones may hold more
  return s;
}

// ------------------------------------------------------------------------------------------------
// Blocks

const FENCE = /^(\s*)(`{3,}|~{3,})\s*([^\s`]*)[^`]*$/;
const HEADING = /^ {0,3}(#{1,6})\s+(.*?)(?:\s+#+)?\s*$/;
const RULE = /^ {0,3}([-*_])(?:\s*\1){2,}\s*$/;
const QUOTE = /^ {0,3}>\s?(.*)$/;
const ITEM = /^(\s*)([-*+]|(\d{1,9})[.)])\s+(.*)$/;
const TABLE_SEPARATOR = /^\s*\|?\s*:?-+:?\s*(?:\|\s*:?-+:?\s*)*\|?\s*$/;
const SETEXT = /^ {0,3}(=+|-+)\s*$/; // a paragraph's underline makes it a heading (h1 "===", h2 "---")

function isBlockStart(line) {
  return FENCE.test(line) || HEADING.test(line) || RULE.test(line) || QUOTE.test(line) || ITEM.test(line);
}

function codeBlock(code, language) {
  const lang = /^[\w+#.-]{1,32}$/.test(language) ? language.toLowerCase() : "";
  return (
    `<div class="code-block"><div class="code-head"><span class="code-lang">${escapeHtml(lang || "text")}</span>` +
    `<button type="button" class="copy-code" aria-label="Copy code">Copy</button></div>` +
    `<pre><code>${highlight(code, lang)}</code></pre></div>`
  );
}

function tableCells(line) {
  const row = line.trim().replace(/^\|/, "").replace(/(?<!\\)\|$/, "");
  return row.split(/(?<!\\)\|/).map((cell) => cell.trim().replace(/\\\|/g, "|"));
}

function table(header, separator, rows) {
  const align = tableCells(separator).map((cell) => {
    const left = cell.startsWith(":");
    const right = cell.endsWith(":");
    return left && right ? ' class="align-center"' : right ? ' class="align-right"' : "";
  });
  const cells = (line, tag) =>
    tableCells(line)
      .slice(0, align.length)
      .map((cell, i) => `<${tag}${align[i] || ""}>${renderInline(cell)}</${tag}>`)
      .join("");
  const body = rows.map((row) => `<tr>${cells(row, "td")}</tr>`).join("");
  return `<div class="table-wrap"><table><thead><tr>${cells(header, "th")}</tr></thead><tbody>${body}</tbody></table></div>`;
}

function list(items) {
  let html = "";
  const open = []; // [{indent, tag}]
  for (const item of items) {
    while (open.length && item.indent < open[open.length - 1].indent) html += `</li></${open.pop().tag}>`;
    const top = open[open.length - 1];
    if (!top || item.indent > top.indent) {
      const tag = item.number === undefined ? "ul" : "ol";
      const start = tag === "ol" && item.number !== "1" ? ` start="${Number(item.number)}"` : "";
      html += `<${tag}${start}>`;
      open.push({ indent: item.indent, tag });
    } else {
      html += "</li>";
    }
    html += `<li>${renderInline(item.text)}`;
  }
  while (open.length) html += `</li></${open.pop().tag}>`;
  return html;
}

/** Markdown source -> HTML string; all of the source's text is escaped (see the top of this file). */
export function renderMarkdown(source) {
  const lines = String(source).replace(/\r\n?/g, "\n").replace(/\u0000/g, "\uFFFD").split("\n");
  const out = [];
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    let m;
    if ((m = line.match(FENCE))) {
      const [, indent, marker, language] = m;
      const close = new RegExp(`^\\s*${marker[0] === "`" ? "`" : "~"}{${marker.length},}\\s*$`);
      const body = [];
      for (i++; i < lines.length && !close.test(lines[i]); i++) {
        body.push(lines[i].startsWith(indent) ? lines[i].slice(indent.length) : lines[i].trimStart());
      }
      i++; // the closing fence (or the end of an unfinished reply)
      out.push(codeBlock(body.join("\n"), language));
    } else if (!line.trim()) {
      i++;
    } else if ((m = line.match(HEADING))) {
      out.push(`<h${m[1].length}>${renderInline(m[2])}</h${m[1].length}>`);
      i++;
    } else if (RULE.test(line)) {
      out.push("<hr>");
      i++;
    } else if (QUOTE.test(line)) {
      const inner = [];
      for (; i < lines.length && (m = lines[i].match(QUOTE)); i++) inner.push(m[1]);
      out.push(`<blockquote>${renderMarkdown(inner.join("\n"))}</blockquote>`);
    } else if (ITEM.test(line)) {
      const items = [];
      while (i < lines.length) {
        const item = lines[i].match(ITEM);
        if (item) {
          items.push({ indent: item[1].replace(/\t/g, "    ").length, number: item[3], text: item[4] });
          i++;
        } else if (lines[i].trim() && !isBlockStart(lines[i])) {
          items[items.length - 1].text += "\n" + lines[i].trim(); // a continuation line of the item
          i++;
        } else if (!lines[i].trim() && i + 1 < lines.length && ITEM.test(lines[i + 1])) {
          i++; // a blank line between items
        } else {
          break;
        }
      }
      out.push(list(items));
    } else if (line.includes("|") && i + 1 < lines.length && TABLE_SEPARATOR.test(lines[i + 1])) {
      const header = line;
      const separator = lines[i + 1];
      const rows = [];
      for (i += 2; i < lines.length && lines[i].includes("|") && lines[i].trim(); i++) rows.push(lines[i]);
      out.push(table(header, separator, rows));
    } else {
      const para = [];
      for (; i < lines.length && lines[i].trim() && (para.length === 0 || !isBlockStart(lines[i])); i++) {
        if (para.length && SETEXT.test(lines[i])) break;
        para.push(lines[i]);
      }
      const underline = i < lines.length && para.length ? lines[i].match(SETEXT) : null;
      if (underline) {
        const level = underline[1][0] === "=" ? 1 : 2;
        out.push(`<h${level}>${renderInline(para.join("\n"))}</h${level}>`);
        i++;
      } else {
        out.push(`<p>${renderInline(para.join("\n"))}</p>`);
      }
    }
  }
  return out.join("");
}
