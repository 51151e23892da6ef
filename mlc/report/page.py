"""The report page's frame: its style, its one script and the Content-Security-Policy that admits only them.

The page opens from disk with no server and no network: no CDN script, no remote font, images as data URIs. The
policy says so to the browser too (``default-src 'none'``): only this script runs (by its sha256, so markup that
escaped escaping could not run one of its own) and only ``data:`` images load.
"""

from __future__ import annotations

import base64
import hashlib
import html

STYLE = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0 auto;max-width:1400px;padding:0 16px 40px;color:#1d2125}
h1{font-size:22px;margin:18px 0 4px}h2{font-size:18px;margin:28px 0 8px;border-bottom:1px solid #ddd;padding-bottom:4px}
nav a{margin-right:12px}table{border-collapse:collapse;margin:6px 0}td,th{border:1px solid #ddd;padding:3px 7px;text-align:left;vertical-align:top}
th{background:#f3f4f6}table.sortable th{cursor:pointer;user-select:none}td.n{text-align:right;font-variant-numeric:tabular-nums}
.kv td:first-child{color:#555;white-space:nowrap}details{margin:6px 0}.note{color:#555}
.plots img{max-width:100%;border:1px solid #eee;margin:4px 0}
.toolbar{position:sticky;top:0;background:#fff;padding:6px 0;z-index:1;border-bottom:1px solid #eee}.toolbar label{margin-right:14px}
.gallery{display:grid;grid-template-columns:repeat(auto-fill,minmax(230px,1fr));gap:10px;margin-top:8px}
.card{border:1px solid #ddd;border-radius:6px;padding:8px;margin:0;background:#fafafa}
.card img{display:block;width:112px;height:auto;min-height:40px;image-rendering:auto;margin-bottom:4px}
.card .noimg{width:112px;height:60px;background:#eee;color:#777;font-size:12px;display:flex;align-items:center;justify-content:center}
.card .id{font-weight:600}.card .cap{color:#444;font-size:13px;margin:3px 0;overflow-wrap:anywhere}
.chip{display:inline-block;border-radius:9px;padding:0 7px;margin:1px 2px;font-size:12px;border:1px solid #bbb;background:#fff}
.hit{background:#dcf5e3;border-color:#3a9a5b}.missed{background:#fde2e1;border-color:#c62828;font-weight:600}
.extra{background:#fff1d6;border-color:#d08a00;font-weight:600}.pred{background:#e6eefc;border-color:#4a6fc1}
.row{margin:2px 0}.row b{display:inline-block;width:64px;color:#555;font-weight:500;font-size:12px}
.bar{display:flex;align-items:center;font-size:12px;gap:4px}.bar span.l{width:44px;overflow:hidden;text-overflow:ellipsis}
.bar span.b{height:8px;background:#4a6fc1;border-radius:2px}.heat td.n{min-width:30px}
"""

SCRIPT = """
(function(){
"use strict";
function num(el,name){var v=parseFloat(el.getAttribute(name));return isNaN(v)?-1:v;}
function apply(bar){
var gallery=document.getElementById(bar.getAttribute("data-for"));
if(!gallery){return;}
var label=bar.querySelector(".f-label").value,sort=bar.querySelector(".f-sort").value;
var cards=Array.prototype.slice.call(gallery.querySelectorAll(".card")),shown=0;
cards.forEach(function(c){
var ok=label===""||(" "+c.getAttribute("data-labels")+" ").indexOf(" "+label+" ")>=0;
c.hidden=!ok;if(ok){shown+=1;}});
function key(c){
if(sort==="top-desc"){return -num(c,"data-top");}
if(sort==="top-asc"){return num(c,"data-top");}
if(sort==="label-desc"){
if(label===""){return -num(c,"data-top");}
var s=parseFloat((c.getAttribute("data-scores")||"").split(" ")[parseInt(label,10)]);
return isNaN(s)?1:-s;}
return num(c,"data-rank");}
cards.sort(function(a,b){return (key(a)-key(b))||(num(a,"data-rank")-num(b,"data-rank"));});
cards.forEach(function(c){gallery.appendChild(c);});
var count=bar.querySelector(".f-count");
if(count){count.textContent=shown+" of "+cards.length+" shown";}
}
Array.prototype.forEach.call(document.querySelectorAll(".toolbar"),function(bar){
bar.addEventListener("change",function(){apply(bar);});apply(bar);});
Array.prototype.forEach.call(document.querySelectorAll("table.sortable"),function(table){
var body=table.tBodies[0];if(!body){return;}
Array.prototype.forEach.call(table.tHead.rows[0].cells,function(th,col){
th.addEventListener("click",function(){
var dir=th.getAttribute("data-dir")==="desc"?1:-1;th.setAttribute("data-dir",dir<0?"desc":"asc");
var rows=Array.prototype.slice.call(body.rows);
rows.sort(function(a,b){
var x=a.cells[col].getAttribute("data-v"),y=b.cells[col].getAttribute("data-v");
if(x!==null&&y!==null){return dir*((parseFloat(x)||0)-(parseFloat(y)||0));}
return dir*a.cells[col].textContent.localeCompare(b.cells[col].textContent);});
rows.forEach(function(r){body.appendChild(r);});});});});
document.body.setAttribute("data-ready","1");
})();
"""

SCRIPT_HASH = base64.b64encode(hashlib.sha256(SCRIPT.encode("utf-8")).digest()).decode("ascii")
POLICY = f"default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'sha256-{SCRIPT_HASH}'"


def esc(value) -> str:
    """Text for HTML, attribute values included: captions, labels and ids come from untrusted tables."""
    return html.escape("" if value is None else str(value), quote=True)


def page(title: str, body: str) -> str:
    """The whole document around ``body`` (already escaped markup)."""
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta http-equiv=\"Content-Security-Policy\" content=\"{esc(POLICY)}\">"
            "<meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">"
            f"<title>{esc(title)}</title><style>{STYLE}</style></head>\n<body>\n{body}\n"
            f"<script>{SCRIPT}</script>\n</body></html>\n")
