// In-page accessibility audit run by test_accessibility.py (see there for what it checks).
(() => {
  const lum = (rgb) => { const c = rgb.map(v => { v /= 255; return v <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4; });
    return 0.2126 * c[0] + 0.7152 * c[1] + 0.0722 * c[2]; };
  const parse = (s) => { const m = s.match(/rgba?\(([^)]+)\)/); if (!m) return null;
    const p = m[1].split(',').map(x => parseFloat(x)); return {rgb: p.slice(0, 3), a: p.length > 3 ? p[3] : 1}; };
  const bgOf = (el) => { for (let e = el; e; e = e.parentElement) { const c = parse(getComputedStyle(e).backgroundColor);
      if (c && c.a > 0.5) return c.rgb; } return [255, 255, 255]; };
  const visible = (el) => { const r = el.getBoundingClientRect(); const s = getComputedStyle(el);
    return r.width > 0 && r.height > 0 && s.visibility !== 'hidden' && s.display !== 'none' && r.left > -1000; };
  const problems = [];
  for (const el of document.querySelectorAll('body *')) {
    if (el.closest('svg') || !visible(el)) continue;
    const own = [...el.childNodes].some(n => n.nodeType === 3 && n.textContent.trim());
    if (!own) continue;
    const s = getComputedStyle(el);
    const fg = parse(s.color).rgb, bg = bgOf(el);
    const [a, b] = [lum(fg), lum(bg)].sort((x, y) => y - x);
    const ratio = (a + 0.05) / (b + 0.05);
    const size = parseFloat(s.fontSize), bold = parseInt(s.fontWeight) >= 700;
    const need = (size >= 24 || (size >= 18.66 && bold)) ? 3 : 4.5;
    if (ratio < need) problems.push(`contrast ${ratio.toFixed(2)} < ${need}: <${el.tagName.toLowerCase()}> "${el.textContent.trim().slice(0, 40)}"`);
  }
  for (const el of document.querySelectorAll('input, select, textarea, button')) {
    if (!visible(el)) continue;
    const named = (el.labels && el.labels.length) || el.getAttribute('aria-label') || el.getAttribute('aria-labelledby')
      || (el.tagName === 'BUTTON' && el.textContent.trim());
    if (!named) problems.push(`unnamed control <${el.tagName.toLowerCase()} id=${el.id}>`);
  }
  for (const svg of document.querySelectorAll('svg[role=img]')) {
    const ids = (svg.getAttribute('aria-labelledby') || '').split(/\s+/).filter(Boolean);
    const text = ids.map(i => (document.getElementById(i) || {}).textContent || '').join(' ').trim();
    if (!text) problems.push('chart without a text alternative');
  }
  for (const a of document.querySelectorAll('a')) if (visible(a) && !a.textContent.trim() && !a.getAttribute('aria-label'))
    problems.push(`link without text: ${a.href}`);
  const h1 = document.querySelectorAll('main h1').length;
  if (h1 !== 1) problems.push(`${h1} h1 headings in main`);
  if (!document.documentElement.lang) problems.push('no lang on <html>');
  return problems;
})
