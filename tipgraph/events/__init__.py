"""tipgraph's event contract (proto/tipgraph/events): the generated protobuf code."""
