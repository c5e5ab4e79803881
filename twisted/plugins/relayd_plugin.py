"""twistd plugin discovery only; everything else lives in relayd.tap."""

from twisted.application.service import ServiceMaker

msrprelay = ServiceMaker(
    "relayd",
    "relayd.tap",
    "MSRP relay (RFC 4976) with SIP consent relay and permission store",
    "msrprelay",
)
