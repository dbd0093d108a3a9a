"""Parses a received mail (.eml) with the standard library and prints one
JSON document for the tests: headers, the MIME tree flattened to leaf parts,
the HTML table's data rows, the CSV attachment's text, the PNG attachment's
signature check and IHDR size, and the envelope (NNNN.json beside the .eml).
"""

import email
import email.policy
import json
import os
import struct
import sys
from html.parser import HTMLParser


class Rows(HTMLParser):
    """Collects the text of each <td> per table row that has cells."""

    def __init__(self):
        super().__init__()
        self.rows, self.row, self.cell = [], None, None

    def handle_starttag(self, tag, attrs):
        if tag == "tr":
            self.row = []
        elif tag == "td" and self.row is not None:
            self.cell = ""

    def handle_endtag(self, tag):
        if tag == "td" and self.cell is not None:
            self.row.append(self.cell.strip())
            self.cell = None
        elif tag == "tr" and self.row is not None:
            if self.row:
                self.rows.append(self.row)
            self.row = None

    def handle_data(self, data):
        if self.cell is not None:
            self.cell += data


def png_info(data):
    ok = data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    if not ok:
        return {"signature_ok": False}
    width, height = struct.unpack(">II", data[16:24])
    return {"signature_ok": True, "width": width, "height": height}


def main():
    path = sys.argv[1]
    with open(path, "rb") as f:
        msg = email.message_from_binary_file(f, policy=email.policy.default)
    out = {
        "from": str(msg["From"]),
        "to": [a.addr_spec for a in msg["To"].addresses] if msg["To"] else [],
        "subject": str(msg["Subject"]),
        "content_type": msg.get_content_type(),
        "parts": [],
        "html_rows": [],
        "text": None,
        "csv": None,
        "png": None,
    }
    for part in msg.walk():
        if part.is_multipart():
            out["parts"].append({"content_type": part.get_content_type(), "multipart": True})
            continue
        payload = part.get_payload(decode=True) or b""
        ctype = part.get_content_type()
        out["parts"].append(
            {"content_type": ctype, "filename": part.get_filename(), "size": len(payload)}
        )
        if ctype == "text/html" and part.get_filename() is None:
            p = Rows()
            p.feed(part.get_content())
            out["html_rows"] = p.rows
        elif ctype == "text/plain" and part.get_filename() is None:
            out["text"] = part.get_content()
        elif ctype == "text/csv":
            out["csv"] = payload.decode("utf-8")
        elif ctype == "image/png":
            out["png"] = png_info(payload)
    envelope = os.path.splitext(path)[0] + ".json"
    if os.path.exists(envelope):
        with open(envelope) as f:
            out["envelope"] = json.load(f)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
