// pgJDBC (the PostgreSQL JDBC driver, as Java BI tools use it) against Kiln's PostgreSQL
// listener: DatabaseMetaData's table, column, key and index reflection, and a query.
//
// Usage: java -cp postgresql.jar JdbcMetadata.java HOST:PORT [TOKEN CA_PEM]
// (with a token and a CA: TLS with sslmode=verify-full, the token as the password)
// Prints `ok`/`FAIL` per check like checks.py, and exits non-zero if any check failed.

import java.sql.Connection;
import java.sql.DatabaseMetaData;
import java.sql.DriverManager;
import java.sql.ResultSet;
import java.sql.ResultSetMetaData;
import java.sql.SQLException;
import java.sql.Statement;
import java.sql.Types;
import java.util.ArrayList;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;

public class JdbcMetadata {
    static int passed = 0;
    static int failed = 0;

    static void check(String name, boolean ok, Object detail) {
        if (ok) {
            passed++;
            System.out.println("ok   " + name);
        } else {
            failed++;
            System.out.println("FAIL " + name + ": " + detail);
        }
    }

    interface Query {
        ResultSet run() throws SQLException;
    }

    /** The rows of a metadata result set, or null after reporting its failure. */
    static List<Map<String, String>> rows(String name, Query query) {
        try (ResultSet rs = query.run()) {
            ResultSetMetaData md = rs.getMetaData();
            List<Map<String, String>> rows = new ArrayList<>();
            while (rs.next()) {
                Map<String, String> row = new LinkedHashMap<>();
                for (int i = 1; i <= md.getColumnCount(); i++) {
                    row.put(md.getColumnName(i).toUpperCase(), rs.getString(i));
                }
                rows.add(row);
            }
            return rows;
        } catch (SQLException e) {
            check(name, false, e.getMessage());
            return null;
        }
    }

    public static void main(String[] args) throws Exception {
        String url = "jdbc:postgresql://" + args[0] + "/plant?sslmode=disable";
        String password = "";
        boolean secure = args.length >= 3;
        if (secure) {
            url = "jdbc:postgresql://" + args[0] + "/plant?sslmode=verify-full&sslrootcert=" + args[2];
            password = args[1];
        }
        try (Connection conn = DriverManager.getConnection(url, "jdbc", password)) {
            DatabaseMetaData md = conn.getMetaData();
            check("pgJDBC server version", md.getDatabaseProductVersion().startsWith("16.6"),
                md.getDatabaseProductVersion());

            List<Map<String, String>> tables =
                rows("pgJDBC getTables", () -> md.getTables(null, "public", "%", new String[] {"TABLE"}));
            if (tables != null) {
                check("pgJDBC getTables", tables.size() == 1
                    && "cpu".equals(tables.get(0).get("TABLE_NAME")), tables);
            }

            List<Map<String, String>> columns =
                rows("pgJDBC getColumns", () -> md.getColumns(null, "public", "cpu", "%"));
            if (columns != null) {
                Map<String, String> types = new LinkedHashMap<>();
                for (Map<String, String> c : columns) {
                    types.put(c.get("COLUMN_NAME"), c.get("TYPE_NAME") + "/" + c.get("DATA_TYPE"));
                }
                Map<String, String> expected = new LinkedHashMap<>();
                expected.put("time", "timestamptz/" + Types.TIMESTAMP);
                expected.put("host", "text/" + Types.VARCHAR);
                if (!secure) {
                    expected.put("region", "text/" + Types.VARCHAR);
                }
                expected.put("usage", "float8/" + Types.DOUBLE);
                if (!secure) {
                    expected.put("load", "int8/" + Types.BIGINT);
                }
                check("pgJDBC getColumns: type names", types.equals(expected), types);
            }

            List<Map<String, String>> keys =
                rows("pgJDBC getPrimaryKeys", () -> md.getPrimaryKeys(null, "public", "cpu"));
            if (keys != null) {
                check("pgJDBC getPrimaryKeys: none", keys.isEmpty(), keys);
            }
            List<Map<String, String>> indexes =
                rows("pgJDBC getIndexInfo", () -> md.getIndexInfo(null, "public", "cpu", false, true));
            if (indexes != null) {
                check("pgJDBC getIndexInfo: none", indexes.isEmpty(), indexes);
            }
            List<Map<String, String>> imported =
                rows("pgJDBC getImportedKeys", () -> md.getImportedKeys(null, "public", "cpu"));
            if (imported != null) {
                check("pgJDBC getImportedKeys: none", imported.isEmpty(), imported);
            }

            try (Statement s = conn.createStatement();
                 ResultSet rs = s.executeQuery("SELECT time, host, usage FROM cpu ORDER BY time")) {
                ResultSetMetaData rmd = rs.getMetaData();
                String shape = rmd.getColumnTypeName(1) + "," + rmd.getColumnTypeName(2) + ","
                    + rmd.getColumnTypeName(3);
                int n = 0;
                while (rs.next()) {
                    n++;
                }
                check("pgJDBC query: typed columns and rows",
                    shape.equals("timestamptz,text,float8") && n == (secure ? 2 : 3), shape + " " + n);
            }
        }
        System.out.println("jdbc: " + passed + " passed, " + failed + " failed");
        System.exit(failed == 0 ? 0 : 1);
    }
}
