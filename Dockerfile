# stepgate's container image: the release binary on distroless (glibc, no shell, uid 65532).
#
#   docker build -t stepgate:0.1.0 .
#   docker run --rm -e STEPGATE_ALLOW_DEMO_KEYS=true -p 50051:50051 -p 9464:9464 stepgate:0.1.0   # the demo
#
# The Helm chart (helm/stepgate) runs it with its own arguments and policy. docs/kubernetes.md
# explains the image; helm/tests/test_dockerfile.py keeps the build command equal to bench/run's.

# The toolchain the test suite runs on; Cargo.toml's rust-version (1.88) is the floor.
FROM rust:1.95.0-bookworm AS build
WORKDIR /src
# The whole workspace (see .dockerignore): Cargo.toml names the bench crates as members, and
# .cargo/config.toml carries the rustflags (tokio_unstable) the benchmarks were measured with.
COPY . .
RUN cargo build --release --locked -p stepgate

# cc: glibc and libgcc, which the binary links (aws-lc, mimalloc). bookworm above, debian12 here:
# the same glibc.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/stepgate /stepgate
# The demo policy and its keys, so that `docker run` answers; the policy finds the keys relative
# to itself (jwks_file: demo-keys/jwks.json). Never deploy it: anyone can mint its tokens, and so
# the default command refuses to serve it beyond the container's loopback, explaining why, unless
# STEPGATE_ALLOW_DEMO_KEYS=true says that this is the demo (an image run without the chart's
# arguments stops at once rather than trusting tokens anyone can mint).
COPY examples/stepgate.yaml /etc/stepgate/demo/stepgate.yaml
COPY examples/demo-keys/jwks.json /etc/stepgate/demo/demo-keys/jwks.json
USER 65532:65532
EXPOSE 50051 9464
ENTRYPOINT ["/stepgate"]
CMD ["serve", "--config", "/etc/stepgate/demo/stepgate.yaml", "--listen", "0.0.0.0:50051", "--metrics-listen", "0.0.0.0:9464", "--log-format", "json"]
