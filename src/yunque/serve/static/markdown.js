// A small, safe Markdown renderer for model replies: everything is HTML-escaped first, then a fixed set of
// constructs becomes markup (fenced and inline code, headings, lists, quotes, bold, italics, http(s) links,
// paragraphs). No raw HTML passes through, so a reply cannot inject script or markup.
"use strict";

const Markdown = (() => {
  const escape = (s) => s.replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;")
    .replace(/"/g, "&quot;").replace(/'/g, "&#39;");

  function inline(text) {
    // code spans first: nothing inside them is formatted
    return text.split(/(`[^`\n]+`)/).map((part, i) => {
      if (i % 2 === 1) return `<code>${escape(part.slice(1, -1))}</code>`;
      let s = escape(part);
      s = s.replace(/\*\*([^*\n]+)\*\*/g, "<strong>$1</strong>");
      s = s.replace(/(^|[^*\w])\*([^*\n]+)\*(?!\w)/g, "$1<em>$2</em>");
      s = s.replace(/(^|[^_\w])_([^_\n]+)_(?!\w)/g, "$1<em>$2</em>");
      // [text](http://...): the URL is already escaped, and only http(s) is linked
      s = s.replace(/\[([^\]\n]+)\]\((https?:\/\/[^\s)]+)\)/g,
        '<a href="$2" target="_blank" rel="noopener noreferrer">$1</a>');
      return s;
    }).join("");
  }

  function blocks(text) {
    const out = [];
    let para = [], list = null;
    const flushPara = () => { if (para.length) out.push(`<p>${para.map(inline).join("<br>")}</p>`); para = []; };
    const flushList = () => {
      if (list) out.push(`<${list.tag}>${list.items.map((x) => `<li>${inline(x)}</li>`).join("")}</${list.tag}>`);
      list = null;
    };
    for (const line of text.split("\n")) {
      let m;
      if (!line.trim()) { flushPara(); flushList(); continue; }
      if ((m = line.match(/^(#{1,6})\s+(.*)$/))) {
        flushPara(); flushList();
        const n = m[1].length;
        out.push(`<h${n}>${inline(m[2])}</h${n}>`);
      } else if ((m = line.match(/^\s*([-*+]|\d+[.)])\s+(.*)$/))) {
        flushPara();
        const tag = /\d/.test(m[1]) ? "ol" : "ul";
        if (!list || list.tag !== tag) { flushList(); list = { tag, items: [] }; }
        list.items.push(m[2]);
      } else if ((m = line.match(/^>\s?(.*)$/))) {
        flushPara(); flushList();
        out.push(`<blockquote>${inline(m[1])}</blockquote>`);
      } else {
        flushList();
        para.push(line);
      }
    }
    flushPara(); flushList();
    return out.join("");
  }

  function render(source) {
    // fenced code blocks; an unclosed fence (a reply still streaming) is code up to the end
    return source.split(/^```/m).map((part, i) => {
      if (i % 2 === 0) return blocks(part);
      const nl = part.indexOf("\n");
      const lang = nl >= 0 ? part.slice(0, nl).trim() : "";
      const code = nl >= 0 ? part.slice(nl + 1) : part;
      const cls = /^[\w+-]+$/.test(lang) ? ` class="language-${lang}"` : "";
      return `<pre><code${cls}>${escape(code.replace(/\n$/, ""))}</code></pre>`;
    }).join("");
  }

  return { render, escape };
})();
