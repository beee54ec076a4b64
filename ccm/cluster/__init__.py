"""The cluster: nodes on one PostgreSQL database share clients. Node leases and reaping
(`lease`), messages between nodes through the database (`bus`, `messages`), and each node's view
of the clients connected to the others (`directory`)."""
