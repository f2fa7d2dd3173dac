# Builds the warden binary and ships it on a slim Debian image.
FROM rust:1-bookworm AS build
WORKDIR /src
# The whole workspace: cargo reads every member's manifest, even to build one binary.
COPY Cargo.toml Cargo.lock ./
COPY core ./core
COPY chaos ./chaos
COPY src ./src
COPY config ./config
RUN cargo build --release --locked --bin warden

FROM debian:bookworm-slim
RUN useradd --system --home /var/lib/warden --create-home warden
COPY --from=build /src/target/release/warden /usr/local/bin/warden
USER warden
WORKDIR /var/lib/warden
VOLUME /var/lib/warden
ENTRYPOINT ["warden"]
CMD ["node"]
