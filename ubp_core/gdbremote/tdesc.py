"""Target descriptions: which registers a stub has, in which order and size.

A stub describes its register file in XML (``qXfer:features:read:target.xml``, with
``xi:include`` pieces).  The ``g`` packet carries the registers in register-number order
up to some point; the rest are read one by one with ``p``.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass, field

XI = "{http://www.w3.org/2001/XInclude}include"


@dataclass(frozen=True, slots=True)
class RegInfo:
    name: str
    regnum: int
    bits: int
    type: str = "int"

    @property
    def size(self) -> int:
        return (self.bits + 7) // 8


@dataclass(slots=True)
class TargetDescription:
    architecture: str | None
    regs: list[RegInfo] = field(default_factory=list)

    def by_name(self) -> dict[str, RegInfo]:
        return {r.name: r for r in self.regs}


def parse(fetch: Callable[[str], str | None], annex: str = "target.xml") -> TargetDescription:
    """Parse ``annex`` and everything it includes; ``fetch(annex)`` returns XML text."""
    desc = TargetDescription(None)
    next_num = [0]

    def walk(name: str, depth: int) -> None:
        text = fetch(name)
        if text is None or depth > 8:
            return
        if "xmlns:xi" not in text:  # qemu leaves the prefix unbound
            text = text.replace("<xi:include", "<include")
        root = ET.fromstring(text)
        for el in root.iter():
            if el.tag == "architecture" and el.text and desc.architecture is None:
                desc.architecture = el.text.strip()
            elif el.tag == XI or el.tag.endswith("include"):
                href = el.get("href")
                if href:
                    walk(href, depth + 1)
            elif el.tag == "reg":
                num = int(el.get("regnum", next_num[0]))
                next_num[0] = num + 1
                desc.regs.append(RegInfo(el.get("name", f"r{num}"), num,
                                         int(el.get("bitsize", "0")), el.get("type", "int")))

    walk(annex, 0)
    desc.regs.sort(key=lambda r: r.regnum)
    return desc
