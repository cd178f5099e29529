use object_store::memory::InMemory;

use super::*;

const HOUR: i64 = 3_600_000_000_000;

async fn catalog() -> Arc<Catalog> {
    Arc::new(
        Catalog::load(Arc::new(InMemory::new()), HOUR)
            .await
            .unwrap(),
    )
}

async fn add(
    catalog: &Arc<Catalog>,
    name: &str,
    permissions: TokenPermissions,
    expires_at: Option<i64>,
) -> String {
    let text = token::generate();
    catalog
        .create_token(TokenDef {
            id: Default::default(),
            name: name.into(),
            hash: token::hash(&text),
            permissions,
            created_at: 0,
            expires_at,
        })
        .await
        .unwrap();
    text
}

fn database(databases: &[&str], read: bool, write: bool) -> TokenPermissions {
    TokenPermissions::Database {
        databases: databases.iter().map(|d| (*d).to_owned()).collect(),
        read,
        write,
    }
}

#[tokio::test]
async fn tokens_are_enforced_once_an_admin_token_exists() {
    let catalog = catalog().await;
    let auth = Authorizer::new(Arc::clone(&catalog), AuthConfig::default());
    let loopback: SocketAddr = "127.0.0.1:8080".parse().unwrap();
    let everywhere: SocketAddr = "0.0.0.0:8080".parse().unwrap();
    // No token yet: open on loopback, refused elsewhere.
    assert!(!auth.enforced());
    assert_eq!(auth.authenticate(Door::Http, None), Ok(Principal::Anyone));
    assert!(auth.check_startup(&[loopback]).is_ok());
    let err = auth.check_startup(&[loopback, everywhere]).unwrap_err();
    assert!(
        err.contains("0.0.0.0:8080") && err.contains("--without-auth"),
        "{err}"
    );
    let open = Authorizer::new(
        Arc::clone(&catalog),
        AuthConfig {
            without_auth: true,
            admin_token: None,
        },
    );
    assert!(open.check_startup(&[everywhere]).is_ok());

    let admin = add(&catalog, "ops", TokenPermissions::Admin, None).await;
    assert!(auth.enforced());
    assert!(auth.check_startup(&[everywhere]).is_ok());
    assert_eq!(auth.authenticate(Door::Http, None), Err(AuthError::Missing));
    assert_eq!(
        auth.authenticate(Door::Http, Some("kiln_nope")),
        Err(AuthError::Invalid)
    );
    let principal = auth.authenticate(Door::Http, Some(&admin)).unwrap();
    assert_eq!(principal.name(), "ops");
    assert!(principal.allows(Action::Admin) && principal.allows(Action::Write("any")));
    // --without-auth wins even with tokens.
    assert_eq!(open.authenticate(Door::Http, None), Ok(Principal::Anyone));

    let failures = auth.failures();
    let missing = failures
        .get_or_create(&vec![("door", "http"), ("reason", "missing")])
        .get();
    assert_eq!(missing, 1);
}

#[tokio::test]
async fn database_tokens_read_and_write_only_what_they_name() {
    let catalog = catalog().await;
    let auth = Authorizer::new(Arc::clone(&catalog), AuthConfig::default());
    add(&catalog, "ops", TokenPermissions::Admin, None).await;
    let reader = add(&catalog, "grafana", database(&["plant"], true, false), None).await;
    let writer = add(
        &catalog,
        "gateway",
        database(&["plant", "lab"], false, true),
        None,
    )
    .await;
    let all = add(&catalog, "etl", database(&["*"], true, true), None).await;

    let reader = auth.authenticate(Door::Postgres, Some(&reader)).unwrap();
    assert!(reader.allows(Action::Read("plant")));
    assert!(!reader.allows(Action::Write("plant")));
    assert!(!reader.allows(Action::Read("lab")));
    assert!(!reader.allows(Action::Admin));
    assert_eq!(reader.readable_databases(), Some(vec!["plant".to_owned()]));
    let err = auth
        .authorize(Door::Postgres, &reader, Action::Write("plant"))
        .unwrap_err();
    assert!(err.is_forbidden());
    assert_eq!(
        err.to_string(),
        "token \"grafana\" may not write database \"plant\""
    );

    let writer = auth.authenticate(Door::Grpc, Some(&writer)).unwrap();
    assert!(writer.allows(Action::Write("lab")) && !writer.allows(Action::Read("lab")));
    assert_eq!(writer.readable_databases(), Some(vec![]));

    let all = auth.authenticate(Door::Http, Some(&all)).unwrap();
    assert!(all.allows(Action::Read("x")) && all.allows(Action::Write("y")));
    assert!(!all.allows(Action::Admin));
    assert_eq!(all.readable_databases(), None);
}

#[tokio::test]
async fn expired_revoked_and_file_tokens() {
    let catalog = catalog().await;
    let file_token = token::generate();
    let mut auth = Authorizer::new(
        Arc::clone(&catalog),
        AuthConfig {
            without_auth: false,
            admin_token: Some(file_token.clone()),
        },
    );
    auth.now = || 1_000;
    // The file's token is an admin before the catalog has any token.
    assert!(auth.enforced());
    let principal = auth.authenticate(Door::Http, Some(&file_token)).unwrap();
    assert_eq!(principal.name(), FILE_ADMIN_NAME);
    assert!(principal.allows(Action::Admin));

    let old = add(&catalog, "old", database(&["*"], true, true), Some(1_000)).await;
    let fresh = add(&catalog, "fresh", database(&["*"], true, true), Some(1_001)).await;
    assert_eq!(
        auth.authenticate(Door::Http, Some(&old)),
        Err(AuthError::Expired {
            token: "old".into()
        })
    );
    assert!(auth.authenticate(Door::Http, Some(&fresh)).is_ok());
    catalog.revoke_token("fresh", false).await.unwrap();
    assert_eq!(
        auth.authenticate(Door::Http, Some(&fresh)),
        Err(AuthError::Invalid)
    );
}
