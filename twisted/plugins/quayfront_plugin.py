from twisted.application.service import ServiceMaker

quayfront = ServiceMaker(
    "quayfront",
    "quayfront.tap",
    "PROXY protocol + TLS front end for container registries",
    "quayfront",
)
