# Stand-in for node:20-bookworm-slim, for building deploy/Dockerfile where no
# image registry is reachable: Debian bookworm from debootstrap, the Node 20 and
# npm of the machine running the test, and the image's `node` user (uid 1000).
# The machine's CA bundle comes too, trusted by Node: npm then reaches the
# registry the way the machine's own npm does, TLS-inspecting proxies included.
FROM local/debian:bookworm
COPY node /usr/local/bin/node
COPY npm /usr/local/lib/node_modules/npm
COPY ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
ENV NODE_EXTRA_CA_CERTS=/etc/ssl/certs/ca-certificates.crt
RUN ln -s ../lib/node_modules/npm/bin/npm-cli.js /usr/local/bin/npm \
 && ln -s ../lib/node_modules/npm/bin/npx-cli.js /usr/local/bin/npx \
 && groupadd --gid 1000 node \
 && useradd --uid 1000 --gid node --shell /bin/bash --create-home node
CMD ["node"]
